"""The pure engine: policies, keys, decisions, the rules and the pipeline. No I/O, no brokers."""
