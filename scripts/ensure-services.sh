#!/usr/bin/env bash
# Make sure the servers the tests need are listening on loopback; start (and if needed
# install) them when they are not. Usage: ensure-services.sh redis [rabbitmq]
set -euo pipefail

listening() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_for() {
  local name=$1 port=$2
  for _ in $(seq 1 60); do
    listening "$port" && { echo "$name is listening on 127.0.0.1:$port"; return 0; }
    sleep 1
  done
  echo "ERROR: $name did not start on 127.0.0.1:$port" >&2
  return 1
}

apt_install() {
  if ! command -v apt-get >/dev/null; then
    echo "ERROR: $* is not installed and apt-get is not available; install it or run 'docker compose up -d'" >&2
    exit 1
  fi
  local sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "$@" >/dev/null
}

ensure_redis() {
  listening 6379 && { echo "redis is listening on 127.0.0.1:6379"; return 0; }
  command -v redis-server >/dev/null || apt_install redis-server
  mkdir -p /tmp/limitpal-redis
  redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no \
    --dir /tmp/limitpal-redis --logfile /tmp/limitpal-redis/redis.log
  wait_for redis 6379
}

ensure_rabbitmq() {
  listening 5672 && { echo "rabbitmq is listening on 127.0.0.1:5672"; return 0; }
  command -v rabbitmq-server >/dev/null || apt_install rabbitmq-server
  rabbitmq-server -detached
  wait_for rabbitmq 5672
}

for service in "$@"; do
  "ensure_$service"
done
