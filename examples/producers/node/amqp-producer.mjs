// Publish one message with its token to an untrusted RabbitMQ queue (amqplib), with confirms.
//   AMQP_URL=amqp://guest:guest@127.0.0.1:5672/%2f QUEUE=payments.untrusted TOKEN=... node amqp-producer.mjs '{"payment": 7}'
import amqp from 'amqplib'

const connection = await amqp.connect(process.env.AMQP_URL)
try {
  const channel = await connection.createConfirmChannel()
  channel.sendToQueue(process.env.QUEUE, Buffer.from(process.argv[2]), {
    persistent: true,
    headers: { authorization: `Bearer ${process.env.TOKEN}` }
  })
  await channel.waitForConfirms()
} finally {
  await connection.close()
}
