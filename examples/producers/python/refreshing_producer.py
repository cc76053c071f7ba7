"""A producer that keeps its access token fresh in the process itself (OAuth 2.0 client
credentials, refreshed when a fifth of its lifetime is left), and attaches it to every message.

    TOKEN_URL=https://idp.example/realms/shop/protocol/openid-connect/token CLIENT_SECRET=... \
        BOOTSTRAP=broker:9092 python refreshing_producer.py
"""
import os
import threading
import time

import requests
from confluent_kafka import Producer


class ClientCredentials:
    def __init__(self, token_url, client_id, secret, scope):
        self.args = (token_url, client_id, secret, scope)
        self.token, self.refresh_at, self.lock = None, 0.0, threading.Lock()

    def get(self):
        with self.lock:
            if time.time() >= self.refresh_at:
                url, cid, secret, scope = self.args
                r = requests.post(url, data={"grant_type": "client_credentials", "scope": scope},
                                  auth=(cid, secret), timeout=10)
                r.raise_for_status()
                body = r.json()
                self.token = body["access_token"]
                # Refresh when a fifth of the lifetime is left (at least 30 s before expiry).
                life = body.get("expires_in", 300)
                self.refresh_at = time.time() + max(life * 0.8, life - 30)
            return self.token


if __name__ == "__main__":
    TOKEN_URL, SECRET = os.environ["TOKEN_URL"], os.environ["CLIENT_SECRET"]
    producer = Producer({"bootstrap.servers": os.environ["BOOTSTRAP"]})
    tokens = ClientCredentials(TOKEN_URL, "orders-producer", SECRET, "orders:write")
    producer.produce("orders.untrusted", value=b'{"id":42}',
                     headers=[("authorization", b"Bearer " + tokens.get().encode())])
    producer.flush(10)
