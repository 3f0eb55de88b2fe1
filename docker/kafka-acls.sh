#!/usr/bin/env bash
# Gives each principal of a secureforms deployment only what it needs on an Apache Kafka that
# enforces ACLs (docker/kafka-sasl-ssl.sh runs StandardAuthorizer), with Kafka's own AclCommand, as
# the broker's admin user. The grants are the table in docs/security.md ("Kafka ACLs"). Adding a
# grant that exists changes nothing, so it is safe to run on every start. docker/compose.yaml runs
# it (service kafka-acls) in the apache/kafka image; tests/kafka_security.rs runs it from the jars
# scripts/install-kafka.sh fetches, and checks that these grants are enough for the service and
# that the chat bus and the workspace get nothing more.
#
# Settings (environment):
#   KAFKA_ADMIN_PASSWORD   the broker's admin user (a super user), required
#   KAFKA_BOOTSTRAP        the SASL_SSL listener (kafka:9093)
#   KAFKA_CA               the CA certificate of that listener (/certs/ca.pem)
#   KAFKA_LIBS             Kafka's jars (/opt/kafka/libs)
#   TOPIC_PREFIX           the deployment's topic_prefix (secureforms.)
#   GROUP_PREFIX           the deployment's group_prefix (secureforms)
#   CHATBUS_USER, CHATBUS_GROUP        the chat bus's user and consumer group (chatbus, chatbus)
#   WORKSPACE_USER, WORKSPACE_GROUP    the agent workspace's (workspace, workspace)
#   SECUREFORMS_USER       the nodes' and the CLI's user (secureforms)
set -euo pipefail

fail() { echo "kafka-acls.sh: $*" >&2; exit 2; }
[ -n "${KAFKA_ADMIN_PASSWORD:-}" ] || fail "set KAFKA_ADMIN_PASSWORD (the broker's admin SCRAM user)"
bootstrap=${KAFKA_BOOTSTRAP:-kafka:9093}
ca=${KAFKA_CA:-/certs/ca.pem}
libs=${KAFKA_LIBS:-/opt/kafka/libs}
p=${TOPIC_PREFIX:-secureforms.}
g=${GROUP_PREFIX:-secureforms}
service=${SECUREFORMS_USER:-secureforms}
chatbus=${CHATBUS_USER:-chatbus}
workspace=${WORKSPACE_USER:-workspace}
[ -s "$ca" ] || fail "no CA certificate at $ca; set KAFKA_CA"
command -v java >/dev/null || fail "java is not on PATH"
ls "$libs"/kafka-tools-*.jar >/dev/null 2>&1 || fail "no kafka-tools jar in $libs (AclCommand); set KAFKA_LIBS"

umask 077
config=$(mktemp)
trap 'rm -f "$config"' EXIT
cat >"$config" <<EOF
security.protocol=SASL_SSL
sasl.mechanism=SCRAM-SHA-512
sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required username="admin" password="$KAFKA_ADMIN_PASSWORD";
ssl.truststore.type=PEM
ssl.truststore.location=$ca
EOF

acl() {
    java -Xms32m -Xmx128m -Dlog4j2.level=warn -cp "$libs/*" org.apache.kafka.tools.AclCommand \
        --bootstrap-server "$bootstrap" --command-config "$config" --add --force "$@" >/dev/null \
        || fail "AclCommand --add $* failed (is the broker up, and the admin password right?)"
}

# The nodes and the CLI: every topic and group of the deployment (they create, configure, read
# and write their own topics), and the broker's configuration, read to tell Kafka from tansu.
acl --allow-principal "User:$service" --operation All --topic "$p" --resource-pattern-type prefixed
acl --allow-principal "User:$service" --operation All --group "$g" --resource-pattern-type prefixed
acl --allow-principal "User:$service" --operation DescribeConfigs --cluster
# The chat bus: writes chat events; reads the links it sends to visitors, in its own group.
acl --allow-principal "User:$chatbus" --operation Write --operation Describe --topic "${p}chat-events"
acl --allow-principal "User:$chatbus" --operation Read --operation Describe --topic "${p}form-links"
acl --allow-principal "User:$chatbus" --operation Read --group "${CHATBUS_GROUP:-chatbus}"
# The agent workspace: reads agent events (FormReady, FormRetrieved), in its own group.
acl --allow-principal "User:$workspace" --operation Read --operation Describe --topic "${p}agent-events"
acl --allow-principal "User:$workspace" --operation Read --group "${WORKSPACE_GROUP:-workspace}"
echo "kafka-acls.sh: grants in place for $service (${p}*, groups ${g}*), $chatbus and $workspace"
