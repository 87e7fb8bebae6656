"""The cluster lab: network namespaces on one machine (netns), a RabbitMQ cluster in them
(rabbit). Tools for the cluster demo, the tests and the benchmarks; the daemon never imports
them. Root and Linux only."""
