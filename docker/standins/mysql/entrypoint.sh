#!/bin/bash
# First start on an empty data directory: create the system tables, the database and the
# user from MYSQL_* variables on a server that listens on no network (so the healthcheck
# stays false until this is done), then run the real server in the foreground.
set -euo pipefail
if [ "${1:0:1}" = "-" ]; then set -- mariadbd "$@"; fi
if [ "$1" = "mariadbd" ] || [ "$1" = "mysqld" ]; then
  if [ ! -d /var/lib/mysql/mysql ]; then
    echo "[entrypoint] initialising /var/lib/mysql"
    mariadb-install-db --user=mysql --datadir=/var/lib/mysql --skip-test-db \
      --auth-root-authentication-method=normal > /dev/null
    mariadbd --skip-networking --socket=/run/mysqld/init.sock --datadir=/var/lib/mysql &
    pid=$!
    for _ in $(seq 1 60); do
      mariadb --socket=/run/mysqld/init.sock -uroot -e 'SELECT 1' > /dev/null 2>&1 && break
      sleep 0.5
    done
    root_pw="${MYSQL_ROOT_PASSWORD:-}"
    if [ -z "$root_pw" ] && [ -n "${MYSQL_RANDOM_ROOT_PASSWORD:-}" ]; then
      root_pw=$(pwgen -s 32 1); echo "[entrypoint] GENERATED ROOT PASSWORD: $root_pw"
    fi
    sql="DELETE FROM mysql.user WHERE user = '';"
    if [ -n "${MYSQL_DATABASE:-}" ]; then
      sql+="CREATE DATABASE IF NOT EXISTS \`$MYSQL_DATABASE\`;"
    fi
    if [ -n "${MYSQL_USER:-}" ]; then
      sql+="CREATE USER '$MYSQL_USER'@'%' IDENTIFIED BY '${MYSQL_PASSWORD:-}';"
      if [ -n "${MYSQL_DATABASE:-}" ]; then
        sql+="GRANT ALL ON \`$MYSQL_DATABASE\`.* TO '$MYSQL_USER'@'%';"
      fi
    fi
    if [ -n "$root_pw" ]; then
      sql+="ALTER USER 'root'@'localhost' IDENTIFIED BY '$root_pw';"
    fi
    mariadb --socket=/run/mysqld/init.sock -uroot -e "$sql FLUSH PRIVILEGES;"
    kill "$pid"; wait "$pid" || true
    echo "[entrypoint] initialised"
  fi
  exec "$@" --datadir=/var/lib/mysql --bind-address=0.0.0.0 --skip-name-resolve
fi
exec "$@"
