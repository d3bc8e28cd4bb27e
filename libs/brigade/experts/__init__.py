"""Expert parallelism: MoE experts sharded across `brigade experts` processes, dispatch and combine over the bus.

placement: which shard holds which expert (static specs; the live map workers build from shard heartbeats);
dispatch: grouping a step's routed tokens by shard (each token once per shard), wire codec, combine;
shard: the experts of one shard and the compute for one dispatch; remote: the worker-side executor.
"""
