"""Real external engines, run on one machine for ``iotauth demo``, the test suite and the benchmarks.

* :mod:`iotauth.testbed.rabbitmq_cluster` -- a throw-away RabbitMQ cluster on loopback;
* :mod:`iotauth.testbed.rabbitmq` -- that cluster authorised by ``iotauth serve``, configured by
  ``iotauth export rabbitmq`` and followed by its ``--watch``: what an operator runs, as processes.
"""
