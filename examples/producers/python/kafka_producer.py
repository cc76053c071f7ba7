"""Publish one message with its token to an untrusted Kafka topic (confluent-kafka).

    BOOTSTRAP=127.0.0.1:9092 TOPIC=orders.untrusted TOKEN="$(tokengate token fetch ...)" \
        python kafka_producer.py '{"order": 42}'
"""
import os
import sys

from confluent_kafka import Producer

producer = Producer({"bootstrap.servers": os.environ["BOOTSTRAP"], "enable.idempotence": True})
producer.produce(
    os.environ["TOPIC"],
    key=b"order-42",
    value=sys.argv[1].encode(),
    headers=[("authorization", f"Bearer {os.environ['TOKEN']}".encode())],
)
if producer.flush(10) != 0:
    sys.exit("message not delivered within 10 s")
