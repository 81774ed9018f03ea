"""What a client does: local training on its own shard, then one upload."""
