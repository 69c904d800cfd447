"""Layer-wise learning-rate decay for ViT fine-tuning (MAE paper, Appendix A.2; from BEiT).

A ViT with `depth` blocks is seen as `num_layers = depth + 1` layers:

    layer 0            cls_token, pos_embed, patch_embed.*
    layer i + 1        blocks.i.*
    layer num_layers   everything else (fc_norm / norm, head)

and the parameters of layer `l` train with lr * layer_decay ** (num_layers - l), so the head keeps
the full lr and the patch embedding gets the smallest one. The groups returned here carry
`lr_scale`; `util.lr_sched.adjust_learning_rate` sets each group's lr to lr * lr_scale.

timm 1.x has `timm.optim.param_groups_layer_decay`, which finds the layers through the model's
`group_matcher`; this module keeps the original release's explicit rule, its group names and its
group order, hence optimizer state_dicts interchangeable with the original's checkpoints. That
order follows the original's parameter order (see original_param_order).
"""
import torch.nn as nn


def get_layer_id_for_vit(name: str, num_layers: int) -> int:
    """Layer index of the parameter called `name` in a ViT seen as `num_layers` layers."""
    if name in ("cls_token", "pos_embed"):
        return 0
    if name.startswith("patch_embed"):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1  # "blocks.3.attn.qkv.weight" -> 4
    return num_layers


def original_param_order(model: nn.Module):
    """model.named_parameters() in the order of the original release's models: its timm 0.3.2
    VisionTransformer registered `head` in __init__ and MAE added `fc_norm` after it, while timm
    1.x registers fc_norm before head. Without this, the head's two groups (layer_L_decay with
    head.weight, layer_L_no_decay with head.bias and fc_norm) swap places and an original
    checkpoint's optimizer state does not load."""
    named = list(model.named_parameters())
    fc_norm = [(n, p) for n, p in named if n.startswith("fc_norm.")]
    return [(n, p) for n, p in named if not n.startswith("fc_norm.")] + fc_norm  # fc_norm last


def _build_groups(model: nn.Module, weight_decay: float, no_weight_decay_list, layer_decay: float):
    """Two dicts keyed by group name "layer_{id}_{decay|no_decay}", in the original's parameter
    order: the optimizer groups {lr_scale, weight_decay, params} and the same with parameter names."""
    num_layers = len(model.blocks) + 1
    layer_scales = [layer_decay ** (num_layers - i) for i in range(num_layers + 1)]

    param_groups, param_group_names = {}, {}
    for name, p in original_param_order(model):
        if not p.requires_grad:
            continue  # frozen, e.g. a fixed sin-cos pos_embed
        if p.ndim == 1 or name in no_weight_decay_list:
            g_decay, this_decay = "no_decay", 0.0  # biases, norm weights, listed tokens
        else:
            g_decay, this_decay = "decay", weight_decay
        layer_id = get_layer_id_for_vit(name, num_layers)
        group_name = f"layer_{layer_id}_{g_decay}"

        if group_name not in param_groups:
            this_scale = layer_scales[layer_id]
            param_groups[group_name] = {"lr_scale": this_scale, "weight_decay": this_decay, "params": []}
            param_group_names[group_name] = {"lr_scale": this_scale, "weight_decay": this_decay, "params": []}
        param_groups[group_name]["params"].append(p)
        param_group_names[group_name]["params"].append(name)
    return param_groups, param_group_names


def param_groups_lrd(model: nn.Module, weight_decay: float = 0.05, no_weight_decay_list=(),
                     layer_decay: float = 0.75) -> list[dict]:
    """Optimizer param groups with layer-wise lr decay, for `torch.optim.AdamW(groups, lr=...)`.

    model: a ViT with `.blocks` and timm parameter names. Each group is
    {'lr_scale': layer_decay ** (num_layers - layer), 'weight_decay': weight_decay or 0.,
    'params': [tensors]}; 1-D params and names in `no_weight_decay_list` get weight_decay 0.
    """
    param_groups, _ = _build_groups(model, weight_decay, no_weight_decay_list, layer_decay)
    return list(param_groups.values())


def param_group_names_lrd(model: nn.Module, weight_decay: float = 0.05, no_weight_decay_list=(),
                          layer_decay: float = 0.75) -> dict[str, dict]:
    """The groups of `param_groups_lrd` by group name, with parameter names instead of tensors
    (for logging / debugging, e.g. `print(json.dumps(param_group_names_lrd(model), indent=2))`)."""
    _, param_group_names = _build_groups(model, weight_decay, no_weight_decay_list, layer_decay)
    return param_group_names
