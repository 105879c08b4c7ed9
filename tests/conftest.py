"""Shared fixtures, written once. Each fixture module is owned by the layer it sets up."""

pytest_plugins = ["tests.fixtures.pki", "tests.fixtures.devices", "tests.fixtures.broker", "tests.fixtures.postgres",
                  "tests.fixtures.service", "tests.fixtures.cli", "tests.fixtures.upstream", "tests.fixtures.emqx_api",
                  "tests.fixtures.softhsm", "tests.fixtures.rabbitmq", "tests.fixtures.mosquitto",
                  "tests.fixtures.metrics"]
