"""The Kafka bench's peer: what a team would write by hand instead of tokengate. It reads a topic,
verifies each message's bearer token with PyJWT (the public key parsed once), checks the tokens'
jti, sub, kid and fingerprint keys in Redis (one pipelined round trip per batch of up to 500),
republishes accepted messages with the subject as a header, and commits offsets after each batch
is delivered (at least once per batch).

    peer.py BOOTSTRAP TOPIC_IN TOPIC_OUT GROUP MESSAGES PUBLIC_KEY_PEM REDIS_URL PREFIX

Prints one JSON line: messages, seconds (first to last message handled), msgs_per_sec, and
cpu_secs (this process, with librdkafka's threads) while it ran."""
import hashlib
import json
import resource
import sys
import time

import jwt
import redis
from confluent_kafka import Consumer, Producer
from cryptography.hazmat.primitives.serialization import load_pem_public_key

bootstrap, topic_in, topic_out, group, messages, pem_path, redis_url, prefix = sys.argv[1:9]
messages = int(messages)
with open(pem_path, "rb") as f:
    key = load_pem_public_key(f.read())  # parsed once
r = redis.Redis.from_url(redis_url)
consumer = Consumer({
    "bootstrap.servers": bootstrap,
    "group.id": group,
    "auto.offset.reset": "earliest",
    "enable.auto.commit": False,
    "fetch.wait.max.ms": 10,
})
producer = Producer({"bootstrap.servers": bootstrap, "acks": "all", "enable.idempotence": True, "linger.ms": 5})
consumer.subscribe([topic_in])


def cpu():
    u = resource.getrusage(resource.RUSAGE_SELF)
    return u.ru_utime + u.ru_stime


done, start, cpu_start = 0, None, None
while done < messages:
    batch = consumer.consume(num_messages=500, timeout=1.0)
    if not batch:
        continue
    if start is None:
        start, cpu_start = time.monotonic(), cpu()
    verified = []
    pipe = r.pipeline(transaction=False)
    for m in batch:
        if m.error():
            continue
        headers = dict(m.headers() or [])
        token = (headers.get("authorization") or b"").decode()
        if token.startswith("Bearer "):
            token = token[len("Bearer "):]
        try:
            header = jwt.get_unverified_header(token)
            claims = jwt.decode(token, key, algorithms=["RS256"], audience="tokengate", issuer="https://idp.bench")
        except jwt.PyJWTError:
            continue  # a real consumer would dead-letter it
        fp = hashlib.sha256(token.rsplit(".", 1)[0].encode()).hexdigest()
        pipe.exists(f"{prefix}revoked:jti:{claims.get('jti')}", f"{prefix}revoked:sub:{claims.get('sub')}",
                    f"{prefix}revoked:kid:{header.get('kid')}", f"{prefix}revoked:fp:{fp}")
        verified.append((m, claims))
    for (m, claims), revoked in zip(verified, pipe.execute()):
        if revoked:
            continue
        producer.produce(topic_out, value=m.value(), key=m.key(), headers=[("x-sub", claims["sub"].encode())])
        producer.poll(0)
    producer.flush()
    consumer.commit(asynchronous=False)
    done += len(batch)
elapsed = time.monotonic() - start
print(json.dumps({"messages": done, "seconds": elapsed, "msgs_per_sec": done / elapsed,
                  "cpu_secs": cpu() - cpu_start}))
consumer.close()
