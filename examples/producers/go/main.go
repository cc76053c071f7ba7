// Command producer publishes one record with its token to an untrusted Kafka topic (franz-go)
// and waits for the broker's acknowledgement.
//
//	BOOTSTRAP=127.0.0.1:9092 TOPIC=orders.untrusted TOKEN=... go run . '{"order": 42}'
package main

import (
	"context"
	"log"
	"os"
	"time"

	"github.com/twmb/franz-go/pkg/kgo"
)

func main() {
	client, err := kgo.NewClient(kgo.SeedBrokers(os.Getenv("BOOTSTRAP")))
	if err != nil {
		log.Fatal(err)
	}
	defer client.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	record := &kgo.Record{
		Topic: os.Getenv("TOPIC"),
		Key:   []byte("order-42"),
		Value: []byte(os.Args[1]),
		Headers: []kgo.RecordHeader{
			{Key: "authorization", Value: []byte("Bearer " + os.Getenv("TOKEN"))},
		},
	}
	if err := client.ProduceSync(ctx, record).FirstErr(); err != nil {
		log.Fatal(err)
	}
}
