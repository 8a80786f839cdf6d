"""Development tools that do not ship in the wheel: private RabbitMQ and PostgreSQL for tests,
benchmarks and the demo (``devservices``, ``devcontainers``), a worker pool of subprocesses
(``pool``) and a latency recorder for load generators (``loadgen``)."""
