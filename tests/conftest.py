"""Test tiers: unit (in-memory), integration (real PostgreSQL + RabbitMQ), system (processes).

Servers come from ARBITER_TEST_AMQP_URL / ARBITER_TEST_DATABASE_URL when set,
else testcontainers when a Docker engine answers, else local processes
(``devtools.devservices``).
"""

pytest_plugins = ["tests.fixtures.services", "tests.fixtures.databases"]
