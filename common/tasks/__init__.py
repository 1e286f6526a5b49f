"""Tasks by name (``common.tasks.base``), one module per task.

Importing this package registers the built-in tasks and keeps the public names importable
from ``common.tasks`` as before the package split.
"""

from common.tasks.base import (
    Batch,
    MetricStates,
    Overlay,
    Task,
    get_task,
    inverse_frequency_weights,
    list_tasks,
    register_task,
    task_class,
    unregister_task,
)
from common.tasks.classification import ClassificationTask
from common.tasks.detection import (
    ATSSRetinaNetDetector,
    DetectionTask,
    boxes_target,
    semantic_map,
)
from common.tasks.instance import (
    InstanceTask,
    SegmentationTap,
    instance_target,
    mask_boxes,
    masks_in_boxes,
)
from common.tasks.multilabel import MultilabelTask
from common.tasks.segmentation import SegmentationTask

__all__ = [
    "ATSSRetinaNetDetector",
    "Batch",
    "ClassificationTask",
    "DetectionTask",
    "InstanceTask",
    "MultilabelTask",
    "MetricStates",
    "Overlay",
    "SegmentationTap",
    "SegmentationTask",
    "Task",
    "boxes_target",
    "get_task",
    "instance_target",
    "inverse_frequency_weights",
    "list_tasks",
    "mask_boxes",
    "masks_in_boxes",
    "register_task",
    "semantic_map",
    "task_class",
    "unregister_task",
]
