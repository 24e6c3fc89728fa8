"""On-disk format as pure functions: manifest schema and shard layout.

Nothing here touches files or torch.distributed, so it is tested without processes.
"""
