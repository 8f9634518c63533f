#!/bin/sh
# Runs once, when the PostgreSQL volume is first initialised (docker-entrypoint-initdb.d):
# one database per service, owned by $POSTGRES_USER.
set -eu
prefix="${SELFATTN_DB_PREFIX:-selfattn}"
for service in mlflow prefect optuna; do
  psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname postgres \
    -c "CREATE DATABASE \"${prefix}_${service}\" OWNER \"$POSTGRES_USER\";"
done
