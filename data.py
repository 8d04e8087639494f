"""(work in progress: see the foundation issue)"""
from dataclasses import dataclass

from torch.utils.data import DataLoader


@dataclass
class TaskLoaders:
    """The data of one task handed to begin_task / end_task."""
    train: DataLoader
    """the task's training images with train transforms, shuffled"""
    plain: DataLoader
    """the same images with test transforms, in a fixed order (prototypes, statistics)"""
