#!/usr/bin/env bash
# The brokers and tools the tests need, on loopback, for a developer, the
# tests themselves and CI alike. Idempotent: what is already there (a
# package, a cached jar, a broker answering on its port) is left alone, so a
# second `up` takes about a second.
#
#   scripts/services.sh up [WHAT...]      # default: rabbitmq kafka tools
#   scripts/services.sh down [WHAT...]    # stops what this script started
#   scripts/services.sh status
#   scripts/services.sh env               # export lines: where each service listens
#   scripts/services.sh kafka-cluster stop|kill|start N   # one node (1..3) of the cluster
#   scripts/services.sh kafka-kill        # SIGKILL the single broker (`up kafka` restarts it)
#   scripts/services.sh kafka-batches TOPIC PARTITION     # record batches on the single broker
#
# WHAT is any of:
#   rabbitmq       Debian's rabbitmq-server on 127.0.0.1:5672 (guest/guest),
#                  installed if missing, started when the port is closed.
#   kafka          Apache Kafka (KRaft, one combined broker+controller) on
#                  127.0.0.1:19092, from Maven Central jars cached outside
#                  the repository ($DUVO_SERVICES_CACHE, default
#                  ~/.cache/duvo-bridge).
#   kafka-cluster  three KRaft nodes on 127.0.0.1:19192,19193,19194
#                  (default replication factor 3, min.insync.replicas 2),
#                  for tests that kill and restart one broker.
#   tools          the C build dependencies of librdkafka and fuse3 (apt), cargo-nextest,
#                  confluent-kafka and pika (the Python clients the
#                  end-to-end scripts and the readiness check use).
#
# Environment: KAFKA_VERSION (default 4.1.1), DUVO_SERVICES_CACHE (jars),
# DUVO_SERVICES_STATE (broker data, logs, pids; default
# /tmp/duvo-bridge-services), KAFKA_HEAP (default 768m per node).
set -euo pipefail

KAFKA_VERSION="${KAFKA_VERSION:-4.1.1}"
LOG4J_VERSION=2.24.3
CACHE="${DUVO_SERVICES_CACHE:-$HOME/.cache/duvo-bridge}"
STATE="${DUVO_SERVICES_STATE:-/tmp/duvo-bridge-services}"
KAFKA_LIBS="$CACHE/kafka-$KAFKA_VERSION/libs"
KAFKA_HEAP="${KAFKA_HEAP:-768m}"
KAFKA_PORT=19092
CLUSTER_PORTS=(19192 19193 19194)
CLUSTER_CONTROLLER_PORTS=(19292 19293 19294)
RABBIT_PORT=5672

say() { printf '[services] %s\n' "$*" >&2; }
die() { say "error: $*"; exit 1; }
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
wait_port() { # port seconds
  local i
  for ((i = 0; i < $2 * 4; i++)); do port_open "$1" && return 0; sleep 0.25; done
  return 1
}
as_root() { if [[ $(id -u) == 0 ]]; then "$@"; else sudo "$@"; fi; }
apt_install() {
  say "installing $* (apt)"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

# ---------------------------------------------------------------- RabbitMQ

rabbitmq_up() {
  if port_open "$RABBIT_PORT"; then say "RabbitMQ up on 127.0.0.1:$RABBIT_PORT"; return; fi
  command -v rabbitmq-server >/dev/null || [[ -x /usr/sbin/rabbitmq-server ]] || apt_install rabbitmq-server
  export PATH="$PATH:/usr/sbin:/usr/lib/rabbitmq/bin"
  say "starting RabbitMQ"
  # Debian's package runs as the rabbitmq user when started by root; its
  # home (/var/lib/rabbitmq) holds the Erlang cookie and the node's data.
  rabbitmq-server -detached >/dev/null 2>&1 9>&- || true
  wait_port "$RABBIT_PORT" 90 || die "RabbitMQ did not open 127.0.0.1:$RABBIT_PORT (see /var/log/rabbitmq/)"
  # The port opens before the node accepts logins: wait for the boot to end.
  rabbitmqctl await_startup --timeout 60 >/dev/null 2>&1 || true
  say "RabbitMQ up on 127.0.0.1:$RABBIT_PORT"
}

rabbitmq_down() {
  port_open "$RABBIT_PORT" || return 0
  export PATH="$PATH:/usr/sbin:/usr/lib/rabbitmq/bin"
  rabbitmqctl stop >/dev/null 2>&1 || true
  say "RabbitMQ stopped"
}

# ------------------------------------------------------------------- Kafka

kafka_jars() {
  if [[ -f "$KAFKA_LIBS/kafka_2.13-$KAFKA_VERSION.jar" && -f "$KAFKA_LIBS/.complete" ]]; then return; fi
  command -v java >/dev/null || apt_install openjdk-17-jre-headless
  command -v mvn >/dev/null || apt_install maven
  say "fetching Apache Kafka $KAFKA_VERSION and its dependencies from Maven Central into $KAFKA_LIBS"
  local pom
  pom="$(mktemp -d)"
  cat >"$pom/pom.xml" <<EOF
<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>duvo-bridge.services</groupId>
  <artifactId>kafka-broker</artifactId>
  <version>1</version>
  <packaging>pom</packaging>
  <dependencies>
    <dependency><groupId>org.apache.kafka</groupId><artifactId>kafka_2.13</artifactId><version>$KAFKA_VERSION</version></dependency>
    <!-- The broker logs through slf4j 1.x: route it to log4j2 (a file). -->
    <dependency><groupId>org.apache.logging.log4j</groupId><artifactId>log4j-slf4j-impl</artifactId><version>$LOG4J_VERSION</version></dependency>
  </dependencies>
</project>
EOF
  rm -rf "$KAFKA_LIBS.tmp"
  (cd "$pom" && mvn -B -q -Dstyle.color=never dependency:copy-dependencies -DincludeScope=runtime -DoutputDirectory="$KAFKA_LIBS.tmp") ||
    die "mvn could not fetch org.apache.kafka:kafka_2.13:$KAFKA_VERSION"
  rm -rf "$pom" "$KAFKA_LIBS"
  mv "$KAFKA_LIBS.tmp" "$KAFKA_LIBS"
  touch "$KAFKA_LIBS/.complete"
}

kafka_jvm() { # the java command line for a Kafka class
  printf '%s\0' java -Xms128m "-Xmx$KAFKA_HEAP" -XX:+UseG1GC -XX:MaxGCPauseMillis=20 -Djava.awt.headless=true \
    "-Dlog4j2.configurationFile=$STATE/log4j2.xml" -cp "$KAFKA_LIBS/*"
}
kafka_java() { # CLASS args...
  local jvm
  mapfile -d '' jvm < <(kafka_jvm)
  "${jvm[@]}" "$@"
}

kafka_log_config() {
  mkdir -p "$STATE"
  cat >"$STATE/log4j2.xml" <<'EOF'
<?xml version="1.0" encoding="UTF-8"?>
<Configuration status="WARN">
  <Appenders>
    <Console name="out" target="SYSTEM_OUT">
      <PatternLayout pattern="[%d] %p %m (%c)%n"/>
    </Console>
  </Appenders>
  <Loggers>
    <Logger name="state.change.logger" level="WARN"/>
    <Logger name="kafka.request.logger" level="WARN"/>
    <Root level="INFO"><AppenderRef ref="out"/></Root>
  </Loggers>
</Configuration>
EOF
}

# kafka_node NAME NODE_ID PORT CONTROLLER_PORT VOTERS RF
kafka_props() {
  local dir="$STATE/$1" id="$2" port="$3" cport="$4" voters="$5" rf="$6" isr
  isr=$((rf > 1 ? 2 : 1))
  mkdir -p "$dir/data"
  cat >"$dir/server.properties" <<EOF
# Written by scripts/services.sh: a KRaft node on loopback for the tests.
process.roles=broker,controller
node.id=$id
controller.quorum.voters=$voters
listeners=PLAINTEXT://127.0.0.1:$port,CONTROLLER://127.0.0.1:$cport
advertised.listeners=PLAINTEXT://127.0.0.1:$port
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT
log.dirs=$dir/data
num.partitions=1
default.replication.factor=$rf
min.insync.replicas=$isr
offsets.topic.replication.factor=$rf
offsets.topic.num.partitions=10
transaction.state.log.replication.factor=$rf
transaction.state.log.min.isr=$isr
share.coordinator.state.topic.replication.factor=$rf
share.coordinator.state.topic.min.isr=$isr
# Tests join groups constantly: no initial rebalance delay.
group.initial.rebalance.delay.ms=0
group.min.session.timeout.ms=3000
auto.create.topics.enable=true
EOF
}

kafka_format() { # NAME CLUSTER_ID
  local dir="$STATE/$1"
  [[ -f "$dir/data/meta.properties" ]] && return
  kafka_java kafka.tools.StorageTool format -t "$2" -c "$dir/server.properties" --ignore-formatted \
    >"$dir/format.log" 2>&1 || { cat "$dir/format.log" >&2; die "formatting $1's storage failed"; }
}

kafka_start_node() { # NAME PORT
  local dir="$STATE/$1"
  if port_open "$2"; then return; fi
  say "starting Kafka node $1 on 127.0.0.1:$2 (log: $dir/server.log)"
  # setsid: the broker outlives the shell (and the test) that started it.
  local jvm
  mapfile -d '' jvm < <(kafka_jvm)
  # 9>&-: the broker must not inherit (and so hold forever) the lock of main.
  setsid nohup "${jvm[@]}" kafka.Kafka "$dir/server.properties" >>"$dir/server.log" 2>&1 </dev/null 9>&- &
  echo $! >"$dir/pid"
}

kafka_stop_node() { # NAME PORT
  local dir="$STATE/$1" pid
  [[ -f "$dir/pid" ]] || return 0
  pid="$(cat "$dir/pid")"
  if kill -0 "$pid" 2>/dev/null; then
    kill "$pid" 2>/dev/null || true
    local i
    for ((i = 0; i < 120; i++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
    kill -9 "$pid" 2>/dev/null || true
    say "stopped Kafka node $1"
  fi
  rm -f "$dir/pid"
}

# Ready means a metadata request answers with every expected broker and a
# controller, asked with an independent client (confluent-kafka).
kafka_wait_ready() { # BOOTSTRAP BROKERS SECONDS
  python_clients
  python3 - "$1" "$2" "$3" <<'EOF' || die "Kafka at $1 did not answer a metadata request with $2 broker(s) in $3 s"
import sys, time
from confluent_kafka.admin import AdminClient
bootstrap, want, secs = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
admin = AdminClient({"bootstrap.servers": bootstrap, "log_level": 0})
end = time.time() + secs
while time.time() < end:
    try:
        md = admin.list_topics(timeout=2)
        if len(md.brokers) >= want and md.controller_id >= 0:
            sys.exit(0)
    except Exception:
        pass
    time.sleep(0.25)
sys.exit(1)
EOF
}

kafka_up() {
  if port_open "$KAFKA_PORT"; then
    kafka_wait_ready "127.0.0.1:$KAFKA_PORT" 1 60
    say "Kafka up on 127.0.0.1:$KAFKA_PORT"
    return
  fi
  kafka_jars
  kafka_log_config
  kafka_props kafka 1 "$KAFKA_PORT" $((KAFKA_PORT + 1)) "1@127.0.0.1:$((KAFKA_PORT + 1))" 1
  kafka_format kafka "$(cluster_id kafka)"
  kafka_start_node kafka "$KAFKA_PORT"
  wait_port "$KAFKA_PORT" 90 || { tail -30 "$STATE/kafka/server.log" >&2; die "Kafka did not open 127.0.0.1:$KAFKA_PORT"; }
  kafka_wait_ready "127.0.0.1:$KAFKA_PORT" 1 90
  say "Kafka $KAFKA_VERSION up on 127.0.0.1:$KAFKA_PORT"
}

kafka_down() { kafka_stop_node kafka "$KAFKA_PORT"; }

kafka_kill_node() { # NAME: SIGKILL, as a crash or a lost machine would
  local pidf="$STATE/$1/pid" pid i
  [[ -f "$pidf" ]] || return 0
  pid="$(cat "$pidf")"
  kill -9 "$pid" 2>/dev/null || true
  # Gone means its sockets are closed: a start right after finds the port free.
  for ((i = 0; i < 200; i++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.05; done
  rm -f "$pidf"
  say "SIGKILLed Kafka node $1"
}

# One cluster id per data directory, kept beside it.
cluster_id() { # NAME
  local f="$STATE/$1.cluster-id"
  if [[ ! -s "$f" ]]; then
    mkdir -p "$STATE"
    kafka_java kafka.tools.StorageTool random-uuid 2>/dev/null | tail -1 >"$f"
  fi
  cat "$f"
}

cluster_voters() {
  local i v=()
  for i in 0 1 2; do v+=("$((i + 1))@127.0.0.1:${CLUSTER_CONTROLLER_PORTS[$i]}"); done
  (IFS=,; echo "${v[*]}")
}

cluster_bootstrap() { (IFS=,; printf '127.0.0.1:%s' "${CLUSTER_PORTS[0]}"; printf ',127.0.0.1:%s' "${CLUSTER_PORTS[@]:1}"); }

cluster_node_up() { # INDEX (0-based)
  local i="$1" id
  id=$(cluster_id kafka-cluster)
  kafka_props "kafka-cluster-$((i + 1))" "$((i + 1))" "${CLUSTER_PORTS[$i]}" "${CLUSTER_CONTROLLER_PORTS[$i]}" \
    "$(cluster_voters)" 3
  kafka_format "kafka-cluster-$((i + 1))" "$id"
  kafka_start_node "kafka-cluster-$((i + 1))" "${CLUSTER_PORTS[$i]}"
}

kafka_cluster_up() {
  kafka_jars
  kafka_log_config
  local i
  for i in 0 1 2; do cluster_node_up "$i"; done
  for i in 0 1 2; do
    wait_port "${CLUSTER_PORTS[$i]}" 120 || die "Kafka node $((i + 1)) did not open 127.0.0.1:${CLUSTER_PORTS[$i]}"
  done
  kafka_wait_ready "$(cluster_bootstrap)" 3 120
  say "Kafka cluster up on $(cluster_bootstrap)"
}

kafka_cluster_down() {
  local i
  for i in 0 1 2; do kafka_stop_node "kafka-cluster-$((i + 1))" "${CLUSTER_PORTS[$i]}"; done
}

kafka_cluster_node() { # stop|start N
  local n="${2:?node number 1..3}"
  [[ "$n" =~ ^[123]$ ]] || die "node is 1, 2 or 3"
  case "$1" in
    stop) kafka_stop_node "kafka-cluster-$n" "${CLUSTER_PORTS[$((n - 1))]}" ;;
    kill) kafka_kill_node "kafka-cluster-$n" ;;
    start)
      kafka_jars
      cluster_node_up $((n - 1))
      wait_port "${CLUSTER_PORTS[$((n - 1))]}" 120 || die "Kafka node $n did not open its port"
      kafka_wait_ready "$(cluster_bootstrap)" 3 120
      ;;
    *) die "kafka-cluster stop|kill|start N" ;;
  esac
}

# The record batches of one partition on the single broker, as the broker
# stored them ("BASE LAST" per line, from Kafka's own DumpLogSegments): a
# test checks that a committed offset lies inside a batch.
kafka_batches() { # TOPIC PARTITION
  local data="$STATE/kafka/data" props pid f
  # The broker on the port may have been started with another
  # DUVO_SERVICES_STATE: read its log.dirs from its own properties file.
  for pid in $(pgrep -f 'kafka\.Kafka ' || true); do
    props="$(tr '\0' '\n' <"/proc/$pid/cmdline" 2>/dev/null | tail -1)"
    if [[ -f $props ]] && grep -q "^listeners=PLAINTEXT://127.0.0.1:$KAFKA_PORT," "$props"; then
      data="$(sed -n 's/^log.dirs=//p' "$props")"
    fi
  done
  local dir="$data/$1-$2"
  [[ -d "$dir" ]] || die "no partition $1-$2 on the single broker ($dir)"
  for f in "$dir"/*.log; do
    kafka_java kafka.tools.DumpLogSegments --files "$f" 2>/dev/null |
      sed -n 's/^baseOffset: \([0-9]*\) lastOffset: \([0-9]*\) .*/\1 \2/p'
  done
}

# ------------------------------------------------------------------- tools

python_clients() {
  python3 -c 'import confluent_kafka, pika' 2>/dev/null && return
  say "installing confluent-kafka and pika (pip)"
  python3 -m pip install --quiet --disable-pip-version-check confluent-kafka pika
}

# What building the crate needs beyond Rust: rdkafka builds librdkafka from
# source (C compiler, make) with TLS (libssl-dev through pkg-config) and zlib.
build_deps() {
  local pkg missing=()
  for pkg in build-essential pkg-config libssl-dev zlib1g-dev; do
    dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
  done
  ((${#missing[@]} == 0)) || apt_install "${missing[@]}"
  # The power-loss tests mount a FUSE filesystem: mount(2) as root, else
  # Debian's fusermount3.
  command -v fusermount3 >/dev/null || apt_install fuse3
  # The `top` test drives the live view in an 80x24 tmux pane.
  command -v tmux >/dev/null || apt_install tmux
  [[ -e /dev/fuse ]] || say "warning: /dev/fuse is missing: the power-loss tests cannot mount"
}

tools_up() {
  export PATH="$HOME/.cargo/bin:$PATH"
  build_deps
  if ! command -v cargo-nextest >/dev/null; then
    say "installing cargo-nextest (cargo install --locked; a few minutes)"
    cargo install --locked --quiet cargo-nextest
  fi
  python_clients
  say "tools: $(cargo nextest --version 2>/dev/null | head -1), confluent-kafka $(python3 -c 'import confluent_kafka; print(confluent_kafka.version()[0])')"
}

# ------------------------------------------------------------------ status

status() {
  local p
  port_open "$RABBIT_PORT" && say "rabbitmq: up on 127.0.0.1:$RABBIT_PORT" || say "rabbitmq: down"
  port_open "$KAFKA_PORT" && say "kafka: up on 127.0.0.1:$KAFKA_PORT" || say "kafka: down"
  for p in "${CLUSTER_PORTS[@]}"; do
    port_open "$p" && say "kafka-cluster: node on 127.0.0.1:$p up" || say "kafka-cluster: node on 127.0.0.1:$p down"
  done
  if command -v cargo-nextest >/dev/null || [[ -x "$HOME/.cargo/bin/cargo-nextest" ]]; then
    say "cargo-nextest: installed"
  else
    say "cargo-nextest: missing"
  fi
}

# Where the services listen, for scripts and benches run by hand:
#   eval "$(scripts/services.sh env)"; cargo bench --bench kafka
env_lines() {
  echo "export KAFKA_BOOTSTRAP=127.0.0.1:$KAFKA_PORT"
  echo "export KAFKA_CLUSTER_BOOTSTRAP=$(cluster_bootstrap)"
  echo "export KAFKA_BENCH_BROKERS=127.0.0.1:$KAFKA_PORT"
  echo "export AMQP_URI=amqp://guest:guest@127.0.0.1:$RABBIT_PORT/%2f"
}

main() {
  local cmd="${1:-status}"
  shift || true
  # Tests run in parallel processes and may all ask for the same broker at
  # once: one of them starts it, the others wait and find it up.
  if [[ $cmd == up || $cmd == down || $cmd == kafka-cluster || $cmd == kafka-kill ]]; then
    mkdir -p "$STATE"
    exec 9>"$STATE/.lock"
    flock 9
  fi
  case "$cmd" in
    up | down)
      local what=("$@")
      ((${#what[@]})) || what=(rabbitmq kafka tools)
      local w
      for w in "${what[@]}"; do
        case "$w" in
          rabbitmq) "rabbitmq_$cmd" ;;
          kafka) "kafka_$cmd" ;;
          kafka-cluster) "kafka_cluster_$cmd" ;;
          tools) [[ $cmd == up ]] && tools_up ;;
          *) die "unknown service '$w' (rabbitmq, kafka, kafka-cluster, tools)" ;;
        esac
      done
      ;;
    kafka-cluster) kafka_cluster_node "$@" ;;
    kafka-kill) kafka_kill_node kafka ;;
    kafka-batches) kafka_batches "$@" ;;
    status) status ;;
    env) env_lines ;;
    *) die "usage: services.sh up|down [rabbitmq|kafka|kafka-cluster|tools]... | status | env | kafka-cluster stop|kill|start N | kafka-kill | kafka-batches TOPIC PARTITION" ;;
  esac
}

main "$@"
