#!/usr/bin/env bash
# Apache Kafka with one client listener, SASL_SSL only (SCRAM-SHA-512 over TLS), enforcing ACLs
# (StandardAuthorizer; grant them with docker/kafka-acls.sh), as
# docker/compose.yaml runs it in the apache/kafka image and tests/kafka_security.rs runs it from the
# jars scripts/install-kafka.sh fetches. On first start it makes a CA and the broker's certificate
# with keytool (every JRE has it) and formats the storage with the SCRAM users; then it runs the
# broker in the foreground. The CA certificate clients need is $KAFKA_CERTS/ca.pem.
#
# Settings (environment):
#   KAFKA_ADMIN_PASSWORD        the broker's own user (inter-broker), required
#   KAFKA_SECUREFORMS_PASSWORD  user "secureforms" (nodes and CLI), required
#   KAFKA_CHATBUS_PASSWORD      user "chatbus", optional
#   KAFKA_WORKSPACE_PASSWORD    user "workspace", optional
#   KAFKA_LIBS (/opt/kafka/libs)  KAFKA_DATA (/var/lib/kafka/data)  KAFKA_CERTS (/certs)
#   KAFKA_CONF (/tmp/kafka-conf)  KAFKA_HOST (kafka: advertised name, in the certificate)
#   KAFKA_BIND (0.0.0.0)  KAFKA_PORT (9093)  KAFKA_CONTROLLER_PORT (9094)
#   KAFKA_LOG4J (a log4j2 file; default: the image's, if present)
#   KAFKA_HEAP (-Xms256m -Xmx512m)
#   KAFKA_ONE_NODE (kafka-one-node.properties next to this script: the one-node settings)
# Users and passwords are fixed when the storage is first formatted; change them afterwards with
# kafka-configs.sh --alter --entity-type users (see docs/security.md).
set -euo pipefail

libs=${KAFKA_LIBS:-/opt/kafka/libs}
data=${KAFKA_DATA:-/var/lib/kafka/data}
certs=${KAFKA_CERTS:-/certs}
conf=${KAFKA_CONF:-/tmp/kafka-conf}
host=${KAFKA_HOST:-kafka}
bind=${KAFKA_BIND:-0.0.0.0}
port=${KAFKA_PORT:-9093}
cport=${KAFKA_CONTROLLER_PORT:-9094}

fail() { echo "kafka-sasl-ssl.sh: $*" >&2; exit 2; }
one_node=${KAFKA_ONE_NODE:-$(dirname "$0")/kafka-one-node.properties}
[ -s "$one_node" ] || fail "no one-node settings at $one_node (docker/kafka-one-node.properties); set KAFKA_ONE_NODE"
[ -n "${KAFKA_ADMIN_PASSWORD:-}" ] || fail "set KAFKA_ADMIN_PASSWORD (the broker's own SCRAM user)"
[ -n "${KAFKA_SECUREFORMS_PASSWORD:-}" ] || fail "set KAFKA_SECUREFORMS_PASSWORD (the secureforms nodes' SCRAM user)"
command -v java >/dev/null || fail "java is not on PATH"
command -v keytool >/dev/null || fail "keytool is not on PATH (it comes with every JRE)"
ls "$libs"/kafka_2.13-*.jar >/dev/null 2>&1 || fail "no Kafka jars in $libs; set KAFKA_LIBS"
# Nothing this script writes is for others, except the CA certificate (below).
umask 077
mkdir -p "$certs" "$data" "$conf"

if [ ! -s "$certs/kafka.p12" ]; then
    head -c 24 /dev/urandom | base64 | tr -d '/+=\n' >"$certs/keystore.pass"
    pw=$(cat "$certs/keystore.pass")
    kt() { keytool "$@" -storepass "$pw" -noprompt 2>&1 | grep -v -e '^Certificate was added' -e '^$' || true; }
    kt -genkeypair -alias ca -dname "CN=secureforms Kafka CA" -ext bc:c -keyalg EC -groupname secp256r1 \
        -validity 825 -storetype PKCS12 -keystore "$certs/ca.p12"
    kt -exportcert -rfc -alias ca -keystore "$certs/ca.p12" -file "$certs/ca.pem"
    kt -genkeypair -alias kafka -dname "CN=$host" -keyalg EC -groupname secp256r1 -validity 825 \
        -storetype PKCS12 -keystore "$certs/kafka.p12"
    kt -certreq -alias kafka -keystore "$certs/kafka.p12" -file "$certs/kafka.csr"
    kt -gencert -alias ca -keystore "$certs/ca.p12" -infile "$certs/kafka.csr" -outfile "$certs/kafka.pem" \
        -rfc -validity 825 -ext "SAN=dns:$host,dns:localhost,ip:127.0.0.1"
    kt -importcert -alias ca -file "$certs/ca.pem" -keystore "$certs/kafka.p12"
    kt -importcert -alias kafka -file "$certs/kafka.pem" -keystore "$certs/kafka.p12"
    # The CA's private key is not kept: remaking the certificates makes a new CA.
    rm -f "$certs/ca.p12" "$certs/kafka.csr" "$certs/kafka.pem"
    chmod 644 "$certs/ca.pem"
    [ -s "$certs/ca.pem" ] || fail "could not make the certificates in $certs"
fi
pw=$(cat "$certs/keystore.pass")

cat >"$conf/server.properties" <<EOF
process.roles=broker,controller
node.id=1
controller.quorum.bootstrap.servers=127.0.0.1:$cport
listeners=SASL_SSL://$bind:$port,CONTROLLER://127.0.0.1:$cport
advertised.listeners=SASL_SSL://$host:$port
controller.listener.names=CONTROLLER
inter.broker.listener.name=SASL_SSL
listener.security.protocol.map=CONTROLLER:PLAINTEXT,SASL_SSL:SASL_SSL
sasl.enabled.mechanisms=SCRAM-SHA-512
sasl.mechanism.inter.broker.protocol=SCRAM-SHA-512
listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required username="admin" password="$KAFKA_ADMIN_PASSWORD";
# Every request is authorized: only the admin user (the broker itself) and the loopback-only
# controller listener (PLAINTEXT, so its principal is ANONYMOUS) are super users; everyone else gets
# what docker/kafka-acls.sh grants, and nothing without a grant.
authorizer.class.name=org.apache.kafka.metadata.authorizer.StandardAuthorizer
super.users=User:admin;User:ANONYMOUS
allow.everyone.if.no.acl.found=false
ssl.keystore.type=PKCS12
ssl.keystore.location=$certs/kafka.p12
ssl.keystore.password=$pw
ssl.key.password=$pw
ssl.truststore.type=PKCS12
ssl.truststore.location=$certs/kafka.p12
ssl.truststore.password=$pw
log.dirs=$data
EOF
cat "$one_node" >>"$conf/server.properties"
chmod 600 "$conf/server.properties"

log4j=${KAFKA_LOG4J:-}
if [ -z "$log4j" ] && [ -f /opt/kafka/config/log4j2.yaml ]; then log4j=/opt/kafka/config/log4j2.yaml; fi
log4j_opt=()
[ -n "$log4j" ] && log4j_opt=("-Dlog4j2.configurationFile=$log4j")

if [ ! -f "$data/meta.properties" ]; then
    users=(--add-scram "SCRAM-SHA-512=[name=admin,password=$KAFKA_ADMIN_PASSWORD]"
        --add-scram "SCRAM-SHA-512=[name=secureforms,password=$KAFKA_SECUREFORMS_PASSWORD]")
    [ -n "${KAFKA_CHATBUS_PASSWORD:-}" ] && users+=(--add-scram "SCRAM-SHA-512=[name=chatbus,password=$KAFKA_CHATBUS_PASSWORD]")
    [ -n "${KAFKA_WORKSPACE_PASSWORD:-}" ] && users+=(--add-scram "SCRAM-SHA-512=[name=workspace,password=$KAFKA_WORKSPACE_PASSWORD]")
    java "${log4j_opt[@]}" -cp "$libs/*" kafka.tools.StorageTool format --standalone \
        --cluster-id "${KAFKA_CLUSTER_ID:-c2VjdXJlZm9ybXMtc2FzbA}" --config "$conf/server.properties" "${users[@]}" \
        >/dev/null || fail "formatting $data failed"
fi

# shellcheck disable=SC2086
exec java ${KAFKA_HEAP:--Xms256m -Xmx512m} "${log4j_opt[@]}" -cp "$libs/*" kafka.Kafka "$conf/server.properties"
