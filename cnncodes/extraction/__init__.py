"""Extraction: the run that joins images, network and store. :func:`extract` fills a store once per dataset, resumes
after a crash, and splits the work into shards across processes, devices or machines."""

from ._plan import launched_by_torchrun, launcher_device, parse_devices, parse_shard, shard_from_env
from ._run import extract

__all__ = ["extract", "launched_by_torchrun", "launcher_device", "parse_devices", "parse_shard", "shard_from_env"]
