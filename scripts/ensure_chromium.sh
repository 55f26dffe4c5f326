#!/usr/bin/env bash
# Make sure Debian's Chromium is installed for the MLflow-UI browser test
# (tests/pipelines/test_mlflow_ui.py drives it headless over the DevTools protocol), installing
# the package when it is missing and this user may (root with apt-get). The test skips otherwise.
if ! command -v chromium >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "[test] installing Chromium (Debian package) for the MLflow-UI test"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
        || echo "[test] could not install Chromium; the MLflow-UI test will be skipped"
fi
