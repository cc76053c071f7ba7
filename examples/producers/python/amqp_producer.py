"""Publish one message with its token to an untrusted RabbitMQ queue (pika), with confirms.

    AMQP_URL=amqp://guest:guest@127.0.0.1:5672/%2f QUEUE=payments.untrusted TOKEN=... \
        python amqp_producer.py '{"payment": 7}'
"""
import os
import sys

import pika

connection = pika.BlockingConnection(pika.URLParameters(os.environ["AMQP_URL"]))
channel = connection.channel()
channel.confirm_delivery()  # basic_publish raises if the broker does not confirm
channel.basic_publish(
    exchange="",
    routing_key=os.environ["QUEUE"],
    body=sys.argv[1].encode(),
    properties=pika.BasicProperties(
        delivery_mode=pika.DeliveryMode.Persistent,
        headers={"authorization": f"Bearer {os.environ['TOKEN']}"},
    ),
    mandatory=True,
)
connection.close()
