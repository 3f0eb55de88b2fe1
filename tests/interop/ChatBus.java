// A chat bus built only on independent libraries: the Java Avro library (single-object encoding with
// its own fingerprints) and the Java Kafka client (default partitioner: murmur2 of the key). It sends
// one FormSent and waits for the FormIssued or FormRejected the service answers with, then prints one
// JSON line: {"type":..., "form_id":..., "link":..., "sent_partition":..., "answer_partition":...}.
//
//   java -cp "$(scripts/install-interop.sh)/*" tests/interop/ChatBus.java BROKERS PREFIX SITE CONV FORM AGENT TEMPLATE SECS
import java.nio.ByteBuffer;
import java.nio.ByteOrder;
import java.nio.file.Files;
import java.nio.file.Path;
import java.time.Duration;
import java.util.List;
import java.util.Properties;
import java.util.UUID;
import org.apache.avro.Schema;
import org.apache.avro.SchemaNormalization;
import org.apache.avro.generic.GenericData;
import org.apache.avro.generic.GenericRecord;
import org.apache.avro.message.BinaryMessageDecoder;
import org.apache.avro.message.BinaryMessageEncoder;
import org.apache.kafka.clients.consumer.ConsumerRecord;
import org.apache.kafka.clients.consumer.KafkaConsumer;
import org.apache.kafka.clients.producer.KafkaProducer;
import org.apache.kafka.clients.producer.ProducerRecord;
import org.apache.kafka.clients.producer.RecordMetadata;
import org.apache.kafka.common.TopicPartition;
import org.apache.kafka.common.serialization.ByteArrayDeserializer;
import org.apache.kafka.common.serialization.ByteArraySerializer;

public class ChatBus {
  static Schema load(String file) throws Exception {
    return new Schema.Parser().parse(Files.readString(Path.of("schemas", file)));
  }

  public static void main(String[] a) throws Exception {
    String brokers = a[0], prefix = a[1], site = a[2], conv = a[3], form = a[4], agent = a[5], template = a[6];
    long secs = Long.parseLong(a[7]);
    Schema sent = load("form_sent.avsc");
    Schema issued = load("form_issued.avsc");
    Schema rejected = load("form_rejected.avsc");

    GenericRecord header = new GenericData.Record(sent.getField("header").schema());
    header.put("event_id", UUID.randomUUID().toString());
    header.put("event_type", "FormSent");
    header.put("schema_version", 2);
    header.put("occurred_at", System.currentTimeMillis());
    header.put("site_id", site);
    header.put("conversation_id", conv);
    header.put("correlation_id", form);
    GenericRecord ev = new GenericData.Record(sent);
    ev.put("header", header);
    ev.put("form_id", form);
    ev.put("agent_id", agent);
    ev.put("agent_profile", "agent");
    ev.put("template_id", template);
    ev.put("visitor_ref", null);
    ByteBuffer payload = new BinaryMessageEncoder<GenericRecord>(GenericData.get(), sent).encode(ev);
    byte[] bytes = new byte[payload.remaining()];
    payload.get(bytes);

    Properties pp = new Properties();
    pp.put("bootstrap.servers", brokers);
    pp.put("key.serializer", ByteArraySerializer.class.getName());
    pp.put("value.serializer", ByteArraySerializer.class.getName());
    pp.put("enable.idempotence", "true");
    pp.put("acks", "all");
    RecordMetadata md;
    try (KafkaProducer<byte[], byte[]> producer = new KafkaProducer<>(pp)) {
      md = producer.send(new ProducerRecord<>(prefix + "chat-events", conv.getBytes("UTF-8"), bytes)).get();
    }

    // A reader per answer type; the fingerprint in each record's header says which applies (the
    // decoder refuses a record whose fingerprint it does not know).
    BinaryMessageDecoder<GenericRecord> issuedDecoder = new BinaryMessageDecoder<>(GenericData.get(), issued);
    BinaryMessageDecoder<GenericRecord> rejectedDecoder = new BinaryMessageDecoder<>(GenericData.get(), rejected);
    long issuedFp = SchemaNormalization.parsingFingerprint64(issued);

    Properties cp = new Properties();
    cp.put("bootstrap.servers", brokers);
    cp.put("key.deserializer", ByteArrayDeserializer.class.getName());
    cp.put("value.deserializer", ByteArrayDeserializer.class.getName());
    cp.put("enable.auto.commit", "false");
    long deadline = System.currentTimeMillis() + secs * 1000;
    try (KafkaConsumer<byte[], byte[]> consumer = new KafkaConsumer<>(cp)) {
      String topic = prefix + "form-links";
      List<TopicPartition> parts = consumer.partitionsFor(topic).stream().map(p -> new TopicPartition(topic, p.partition())).toList();
      consumer.assign(parts);
      consumer.seekToBeginning(parts);
      while (System.currentTimeMillis() < deadline) {
        for (ConsumerRecord<byte[], byte[]> r : consumer.poll(Duration.ofMillis(200))) {
          GenericRecord answer;
          try {
            long fp = ByteBuffer.wrap(r.value(), 2, 8).order(ByteOrder.LITTLE_ENDIAN).getLong();
            answer = (fp == issuedFp ? issuedDecoder : rejectedDecoder).decode(r.value());
          } catch (Exception e) {
            System.err.println("undecodable record at " + r.partition() + "/" + r.offset() + ": " + e);
            continue;
          }
          if (!form.equals(String.valueOf(answer.get("form_id")))) continue;
          String type = String.valueOf(((GenericRecord) answer.get("header")).get("event_type"));
          Object link = answer.getSchema().getField("link") != null ? answer.get("link") : null;
          Object reason = answer.getSchema().getField("reason") != null ? answer.get("reason") : null;
          System.out.printf("{\"type\":\"%s\",\"form_id\":\"%s\",\"link\":%s,\"reason\":%s,\"sent_partition\":%d,\"answer_partition\":%d}%n",
              type, form, link == null ? "null" : "\"" + link + "\"", reason == null ? "null" : "\"" + reason + "\"",
              md.partition(), r.partition());
          return;
        }
      }
    }
    System.err.println("no answer for form " + form + " within " + secs + " s");
    System.exit(1);
  }
}
