"""The methods, one self-contained file each, and the registry train.py reads.

The method contract (structural: no base class). A method is an `nn.Module` built as
`Method(vit, num_classes, cfg)` from the backbone (backbone.ViT or timm's VisionTransformer), the
total number of classes and its own frozen `Config` dataclass (a docstring under every field;
defaults = the paper's values; every Config has `lr`, `epochs` and `batch_size`, which the presets
may override). train.py calls:

    grow(t, classes)              structure for task t (heads, adapters), no data; also called for every
                                  finished task on --resume, before load_state_dict(strict=True)
    begin_task(t, classes, data)  may pass over the task's data (statistics, gradient estimates)
    optimizer(steps_per_epoch)    -> (optimizer, scheduler or None) for the trainable parameters, or
                                  (None, None) when nothing trains; the scheduler steps once per batch
    loss(x, y)                    the loss of one training batch (y are global labels): a scalar tensor (one
                                  optimiser step), or a generator that yields one scalar loss per optimiser
                                  step; after each yield train.py does zero_grad, backward (through the
                                  GradScaler), gradient averaging under torchrun, step and scaler update, and
                                  the generator resumes after that step (a later loss needs a fresh forward).
                                  The scheduler steps once per batch, after the last yield; the batch's
                                  recorded loss (progress, NaN check) is the sum of its yielded losses
    end_task(t, classes, data)    merges, freezes, stores prototypes / statistics / subspaces
    forward(x)                    logits over every class seen so far (no task id), through the adapters
    merged()                      optional, for a linear method (all but cl_lora and simple_cil): a plain inference
                                  model, its heads over a copy of the backbone with every adapter folded into the
                                  weights (backbone.fold, backbone.Merged): no adapters, no training state, the
                                  logits of forward up to float rounding. train.py's evaluation builds it once per
                                  evaluation and drops it after; a method without it is evaluated as it is

`classes` are the global labels (positions in the class order) of task t: range(K_t, C_t).
`data` is a data.TaskLoaders: `data.train` (train transforms, shuffled) and `data.plain` (the same
images with test transforms, fixed order); both yield (x, y) with global labels and cover the whole
task on every process. train.py owns backward, gradient averaging, the optimizer step and mixed
precision (loss, each advance of a loss generator, and forward run under autocast; the hooks run
in float32). A method that changes
gradients does so inside `loss` (a custom autograd function or a tensor hook).
Nothing a forward needs lives outside the module's parameters and buffers, so `.to(device or dtype)` converts
a method at any point. Each method checks its Config in `validate(cfg, vit=None)` through
backbone.check_options, the one place its options (lr, epochs and batch_size included) are checked.
Optional module constants train.py reads: `OFFICIAL`, {dataset: {option: value}}, the official code's settings per
dataset (train.py options tasks, order_seed, natural_order, weights; Config fields), applied by `--preset paper
--dataset NAME` (absent: no official config); `PAPER_WEIGHTS`, the paper preset's weights tag when the method's
code starts from other weights than IN-21K.
Anything end_task decides with a data-dependent shape is kept in fixed-shape buffers, so that
grow() alone rebuilds the structure a checkpoint needs. The checkpoint holds the method's state dict
except the backbone tensors that still equal the loaded weights (a merge into the backbone is kept).
"""
from methods import seq_lora, simple_cil
from methods import inflora
from methods import sr2_lora
from methods import c_lora
from methods import cl_lora
from methods import sd_lora
from methods import keep_lora

METHODS = {
    "seq_lora": seq_lora,
    "simple_cil": simple_cil,
    "inflora": inflora,
    "sr2_lora": sr2_lora,
    "c_lora": c_lora,
    "cl_lora": cl_lora,
    "sd_lora": sd_lora,
    "keep_lora": keep_lora,
}
