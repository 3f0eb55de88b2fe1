// Prints the CRC-64-AVRO fingerprint of each schema's Parsing Canonical Form as the Java Avro library
// computes it (SchemaNormalization.parsingFingerprint64), hex in the byte order the single-object
// header carries (little-endian). Regenerates tests/vectors/avro-fingerprints.txt:
//   java -cp "$(scripts/install-interop.sh)/*" tests/interop/Fingerprints.java schemas/*.avsc schemas/history/*.avsc
import java.nio.ByteBuffer;
import java.nio.ByteOrder;
import java.nio.file.Files;
import java.nio.file.Path;
import org.apache.avro.Schema;
import org.apache.avro.SchemaNormalization;

public class Fingerprints {
  public static void main(String[] args) throws Exception {
    System.out.println("# CRC-64-AVRO fingerprints computed by the Java Avro library " + Schema.class.getPackage().getImplementationVersion()
        + " (tests/interop/Fingerprints.java); hex as the single-object header carries them");
    for (String file : args) {
      Schema schema = new Schema.Parser().parse(Files.readString(Path.of(file)));
      long fp = SchemaNormalization.parsingFingerprint64(schema);
      byte[] le = ByteBuffer.allocate(8).order(ByteOrder.LITTLE_ENDIAN).putLong(fp).array();
      StringBuilder hex = new StringBuilder();
      for (byte b : le) hex.append(String.format("%02x", b));
      System.out.println(file + " " + hex);
    }
  }
}
