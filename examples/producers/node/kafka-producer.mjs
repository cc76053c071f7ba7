// Publish one message with its token to an untrusted Kafka topic (@platformatic/kafka).
//   BOOTSTRAP=127.0.0.1:9092 TOPIC=orders.untrusted TOKEN=... node kafka-producer.mjs '{"order": 42}'
import { Producer, stringSerializers } from '@platformatic/kafka'

const producer = new Producer({
  clientId: 'orders-service',
  bootstrapBrokers: [process.env.BOOTSTRAP],
  serializers: stringSerializers,
  idempotent: true
})
try {
  await producer.send({
    messages: [{
      topic: process.env.TOPIC,
      key: 'order-42',
      value: process.argv[2],
      headers: new Map([['authorization', `Bearer ${process.env.TOKEN}`]])
    }]
  })
} finally {
  await producer.close()
}
