#!/usr/bin/env bash
# The whole test suite on a fresh machine: brings up what the tests need
# (scripts/services.sh: RabbitMQ, Apache Kafka single broker and three-node
# cluster, cargo-nextest, the C build dependencies), then runs every test.
# Arguments go to `cargo nextest run` (e.g. a filter: scripts/test.sh kafka).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
bash scripts/services.sh up tools rabbitmq kafka kafka-cluster
exec cargo nextest run --no-fail-fast "$@"
