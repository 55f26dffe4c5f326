#!/usr/bin/env bash
# Start the MLflow tracking server: runs, metrics and the model registry in PostgreSQL, artifacts
# in an S3-compatible bucket (AWS S3, MinIO, ...) that the server proxies (--serve-artifacts), so
# clients need only MLFLOW_TRACKING_URI, never the bucket's credentials.
#
# Everything comes from the environment; nothing secret is read from a file or put on the command
# line (where `ps` would show it): the database password reaches libpq as PGPASSWORD.
#
# Required
#   PGHOST, PGDATABASE, PGUSER, PGPASSWORD   the PostgreSQL server, database, role and password
#   MLFLOW_ARTIFACTS_DESTINATION             s3://bucket[/prefix] where artifacts are stored
#   AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY the bucket's credentials (not needed when the pod
#                                            has a web identity: AWS_WEB_IDENTITY_TOKEN_FILE)
# Optional
#   PGPORT (5432), PGSSLMODE, ...            any other libpq variable
#   AWS_ENDPOINT_URL / MLFLOW_S3_ENDPOINT_URL an S3-compatible endpoint (MinIO, a test server)
#   AWS_DEFAULT_REGION                       the bucket's region
#   MLFLOW_HOST (127.0.0.1)                  the interface to bind; set 0.0.0.0 only behind a
#                                            proxy or with MLFLOW_AUTH=basic-auth
#   MLFLOW_PORT (5000), MLFLOW_WORKERS (2)
#   MLFLOW_ALLOWED_HOSTS                     Host headers accepted (--allowed-hosts) when the
#                                            server is reached by name
#   MLFLOW_AUTH=basic-auth                   MLflow's basic-auth app; then also required:
#       MLFLOW_AUTH_ADMIN_PASSWORD           the admin's password on first start (user: admin,
#                                            or MLFLOW_AUTH_ADMIN_USERNAME)
#       MLFLOW_FLASK_SERVER_SECRET_KEY       the CSRF secret, the same on every replica
#     optional: MLFLOW_AUTH_DEFAULT_PERMISSION (READ) for users without a grant
#     users and permissions live in the same PostgreSQL database (tables of their own)
set -euo pipefail

die() {
    echo "serve.sh: $*" >&2
    exit 2
}

require() {
    local name
    for name in "$@"; do
        [ -n "${!name:-}" ] || die "$name is not set: $(describe "$name") (see the header of $0)"
    done
}

describe() {
    case "$1" in
        PGHOST) echo "the PostgreSQL host holding the tracking database" ;;
        PGDATABASE) echo "the PostgreSQL database for runs and the registry" ;;
        PGUSER) echo "the PostgreSQL role MLflow connects as" ;;
        PGPASSWORD) echo "that role's password (environment only, never in a file)" ;;
        MLFLOW_ARTIFACTS_DESTINATION) echo "the artifact store, e.g. s3://my-bucket/mlflow" ;;
        AWS_ACCESS_KEY_ID | AWS_SECRET_ACCESS_KEY) echo "the artifact bucket's credentials" ;;
        MLFLOW_AUTH_ADMIN_PASSWORD) echo "the basic-auth admin's password, needed on first start" ;;
        MLFLOW_FLASK_SERVER_SECRET_KEY) echo "the basic-auth app's CSRF secret" ;;
        *) echo "required" ;;
    esac
}

require PGHOST PGDATABASE PGUSER PGPASSWORD MLFLOW_ARTIFACTS_DESTINATION
case "$MLFLOW_ARTIFACTS_DESTINATION" in
    s3://?*) ;;
    *) die "MLFLOW_ARTIFACTS_DESTINATION must be an s3:// URL, got '$MLFLOW_ARTIFACTS_DESTINATION'" ;;
esac
if [ -z "${AWS_WEB_IDENTITY_TOKEN_FILE:-}" ]; then
    require AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY
fi
command -v mlflow >/dev/null || die "no 'mlflow' on PATH: install the project with 'pip install .[server]'"

host="${MLFLOW_HOST:-127.0.0.1}"
# The role and database only: libpq adds PGPASSWORD (and PGSSLMODE, ...) from the environment.
# psycopg2 by name: SQLAlchemy 2.1 maps a bare postgresql:// to psycopg 3, which is not installed.
backend="postgresql+psycopg2://${PGUSER}@${PGHOST}:${PGPORT:-5432}/${PGDATABASE}"
args=(
    server
    --host "$host"
    --port "${MLFLOW_PORT:-5000}"
    --workers "${MLFLOW_WORKERS:-2}"
    --backend-store-uri "$backend"
    --serve-artifacts
    --artifacts-destination "$MLFLOW_ARTIFACTS_DESTINATION"
)
if [ -n "${MLFLOW_ALLOWED_HOSTS:-}" ]; then
    args+=(--allowed-hosts "$MLFLOW_ALLOWED_HOSTS")
fi

case "${MLFLOW_AUTH:-}" in
    "") ;;
    basic-auth)
        require MLFLOW_AUTH_ADMIN_PASSWORD MLFLOW_FLASK_SERVER_SECRET_KEY
        # The auth app reads its database from an ini file: write one that holds no secret (the
        # admin password comes from MLFLOW_AUTH_ADMIN_PASSWORD, the database's from PGPASSWORD).
        auth_dir="$(mktemp -d)"
        cat >"$auth_dir/basic_auth.ini" <<INI
[mlflow]
default_permission = ${MLFLOW_AUTH_DEFAULT_PERMISSION:-READ}
database_uri = $backend
admin_username = ${MLFLOW_AUTH_ADMIN_USERNAME:-admin}
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
INI
        export MLFLOW_AUTH_CONFIG_PATH="$auth_dir/basic_auth.ini"
        args+=(--app-name basic-auth)
        ;;
    *) die "MLFLOW_AUTH must be empty or 'basic-auth', got '$MLFLOW_AUTH'" ;;
esac

echo "serve.sh: MLflow on http://$host:${MLFLOW_PORT:-5000}, backend $backend, artifacts $MLFLOW_ARTIFACTS_DESTINATION" >&2
exec mlflow "${args[@]}"
