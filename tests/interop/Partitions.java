// Prints the partition Apache Kafka's Java client gives a keyed record (BuiltInPartitioner
// .partitionForKey: murmur2 of the key bytes, made positive, modulo the count), for a spread of keys
// and partition counts. Regenerates tests/vectors/kafka-partitions.txt:
//   java -cp "$(scripts/install-interop.sh | tail -1)/*" tests/interop/Partitions.java > tests/vectors/kafka-partitions.txt
import java.nio.charset.StandardCharsets;
import org.apache.kafka.clients.producer.internals.BuiltInPartitioner;

public class Partitions {
  public static void main(String[] args) {
    System.out.println("# key partitions partition, from org.apache.kafka.clients.producer.internals.BuiltInPartitioner.partitionForKey ("
        + org.apache.kafka.common.utils.AppInfoParser.getVersion() + ")");
    String[] keys = {"a", "conv-1", "conv-42", "c-0001", "9b2f1c7e-5d7a-4f0e-8c61-3f1a2b4c5d6e", "ünïcödé-conversation", "x".repeat(97), "0", "conversation:acme:77"};
    int[] counts = {1, 2, 3, 6, 12, 64};
    for (String k : keys) {
      for (int n : counts) {
        System.out.println(k + " " + n + " " + BuiltInPartitioner.partitionForKey(k.getBytes(StandardCharsets.UTF_8), n));
      }
    }
    for (int i = 0; i < 50; i++) {
      String k = "conv-" + i;
      System.out.println(k + " 6 " + BuiltInPartitioner.partitionForKey(k.getBytes(StandardCharsets.UTF_8), 6));
    }
  }
}
