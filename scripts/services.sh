#!/usr/bin/env bash
# Starts the local PostgreSQL and Redis used by the tests of the multi-instance modes, if they are not running.
# Best effort outside CI (their tests skip when a service is missing); under CI=true the tests fail instead.
set -uo pipefail
pg_up() { (exec 3<>/dev/tcp/127.0.0.1/5432) 2>/dev/null; }
redis_up() { (exec 3<>/dev/tcp/127.0.0.1/6379) 2>/dev/null; }
if ! pg_up && command -v pg_ctlcluster >/dev/null 2>&1 && [ -d /etc/postgresql ]; then
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n 1)" main start || true
    for _ in $(seq 1 50); do pg_up && break; sleep 0.2; done
fi
if ! redis_up && command -v redis-server >/dev/null 2>&1; then
    redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no || true
    for _ in $(seq 1 50); do redis_up && break; sleep 0.2; done
fi
pg_up || echo "services: PostgreSQL is not reachable on 127.0.0.1:5432" >&2
redis_up || echo "services: Redis is not reachable on 127.0.0.1:6379" >&2
exit 0
