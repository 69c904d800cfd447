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

SimMIM (SPEC-simmim sections 6 and 10): simmim_param_groups (pretraining: decay / no decay with the
official skip sets) and simmim_param_groups_lrd (finetuning a BEiT-style ViT or a Swin: layer ids
0 .. depth + 1, scale = layer_decay ** (num_layers - 1 - id), each group's lr = base_lr * scale).
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


# ---------------------------------------------------------------------------------------------
# SimMIM (SPEC-simmim sections 6 and 10). The skip sets are those of the official models'
# no_weight_decay() / no_weight_decay_keywords(), written out here so that the groups do not
# depend on how a model implements them (timm's Beit, e.g., would also exclude the ViT's tables).
# ---------------------------------------------------------------------------------------------

# Pretraining: the SimMIM wrapper prefixes "encoder." to the encoder's sets, keywords included, so
# the Swin keyword matches no parameter and its relative-position tables ARE decayed (quirk kept).
SIMMIM_PRETRAIN_SKIP = {
    "vit": ({"encoder.pos_embed", "encoder.cls_token"}, ()),  # mask_token and the shared table decayed
    "swin": ({"encoder.absolute_pos_embed", "encoder.mask_token"}, ("encoder.relative_position_bias_table",)),
}
# Finetuning (unwrapped models): the ViT's per-block tables are decayed, Swin's are not.
SIMMIM_FINETUNE_SKIP = {
    "vit": ({"pos_embed", "cls_token"}, ()),
    "swin": ({"absolute_pos_embed"}, ("relative_position_bias_table",)),
}


def simmim_architecture(names, prefix=""):
    """'swin' when some name starts with prefix + 'layers.', 'vit' when one starts with
    prefix + 'blocks.', else a ValueError."""
    names = list(names)
    if any(n.startswith(prefix + "layers.") for n in names):
        return "swin"
    if any(n.startswith(prefix + "blocks.") for n in names):
        return "vit"
    raise ValueError(f"neither a ViT ({prefix}blocks.*) nor a Swin ({prefix}layers.*): {names[:5]}...")


def _no_weight_decay(name, p, skip, keywords):
    """The official rule: 1-D, a '.bias', in the skip set, or containing a skip keyword."""
    return p.ndim == 1 or name.endswith(".bias") or name in skip or any(k in name for k in keywords)


def _pretrain_groups(model, weight_decay):
    names = [n for n, _ in model.named_parameters()]
    skip, keywords = SIMMIM_PRETRAIN_SKIP[simmim_architecture(names, "encoder.")]
    decay = {"weight_decay": weight_decay, "params": [], "names": []}
    no_decay = {"weight_decay": 0.0, "params": [], "names": []}
    for name, p in model.named_parameters():
        if p.requires_grad:
            group = no_decay if _no_weight_decay(name, p, skip, keywords) else decay
            group["params"].append(p)
            group["names"].append(name)
    return [decay, no_decay]


def simmim_param_groups(model, weight_decay=0.05):
    """SimMIM pretraining's two AdamW groups, in the official order: [decay (weight_decay), no decay
    (0)]. model: the SimMIM wrapper (encoder.*, decoder.0.*), ViT or Swin encoder. ViT-B: 52 / 137
    tensors; Swin-B: 125 / 205 (SPEC section 6)."""
    groups = _pretrain_groups(model, weight_decay)
    return [{"weight_decay": g["weight_decay"], "params": g["params"]} for g in groups]


def simmim_param_group_names(model, weight_decay=0.05):
    """The groups of simmim_param_groups with parameter names instead of tensors."""
    groups = _pretrain_groups(model, weight_decay)
    return [{"weight_decay": g["weight_decay"], "params": g["names"]} for g in groups]


def get_layer_id_for_simmim_vit(name, num_layers):
    """Layer id of a BEiT-style ViT parameter, num_layers = depth + 2: cls_token, mask_token,
    pos_embed, patch_embed.* -> 0; blocks.i.* -> i + 1; rel_pos_bias.* and the rest (fc_norm, norm,
    head) -> num_layers - 1."""
    if name in ("cls_token", "mask_token", "pos_embed") or name.startswith("patch_embed"):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return num_layers - 1


def get_layer_id_for_swin(name, depths):
    """Layer id of a Swin parameter (num_layers = sum(depths) + 2): patch_embed.* -> 0;
    layers.s.blocks.j.* -> sum(depths[:s]) + j + 1; layers.s.downsample.* -> sum(depths[:s + 1])
    (the id of the stage's last block); the rest (norm, head) -> sum(depths) + 1. Swin-B: stage 0
    blocks 1, 2 (downsample 2), stage 1 blocks 3, 4 (4), stage 2 blocks 5..22 (22), stage 3 23, 24."""
    if name == "mask_token" or name.startswith("patch_embed"):  # official: a substring test on "mask_token"
        return 0
    if name.startswith("layers."):
        parts = name.split(".")  # layers.s.blocks.j.... or layers.s.downsample....
        stage = int(parts[1])
        if parts[2] == "downsample":
            return sum(depths[:stage + 1])
        return sum(depths[:stage]) + int(parts[3]) + 1
    return sum(depths) + 1


def _depths(names, architecture):
    """ViT: [depth]; Swin: blocks per stage, read off the parameter names."""
    if architecture == "vit":
        return [1 + max(int(n.split(".")[1]) for n in names if n.startswith("blocks."))]
    blocks = [n.split(".") for n in names if n.startswith("layers.") and n.split(".")[2] == "blocks"]
    depths = [0] * (1 + max(int(parts[1]) for parts in blocks))
    for parts in blocks:
        depths[int(parts[1])] = max(depths[int(parts[1])], int(parts[3]) + 1)
    return depths


def _finetune_groups(model, base_lr, weight_decay, layer_decay):
    """{group name: group with 'params' (tensors) and 'names'}, groups in order of first appearance."""
    names = [n for n, _ in model.named_parameters()]
    architecture = simmim_architecture(names)
    skip, keywords = SIMMIM_FINETUNE_SKIP[architecture]
    depths = _depths(names, architecture)
    num_layers = sum(depths) + 2
    groups = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = _no_weight_decay(name, p, skip, keywords)
        if architecture == "vit":
            layer_id = get_layer_id_for_simmim_vit(name, num_layers)
        else:
            layer_id = get_layer_id_for_swin(name, depths)
        group_name = f"layer_{layer_id}_{'no_decay' if no_decay else 'decay'}"
        if group_name not in groups:
            scale = layer_decay ** (num_layers - 1 - layer_id)
            groups[group_name] = {"group_name": group_name, "weight_decay": 0.0 if no_decay else weight_decay,
                                  "lr": base_lr * scale, "lr_scale": scale, "params": [], "names": []}
        groups[group_name]["params"].append(p)
        groups[group_name]["names"].append(name)
    return groups


def simmim_param_groups_lrd(model, base_lr, weight_decay=0.05, layer_decay=0.65):
    """SimMIM finetuning's AdamW groups with layer-wise lr decay, for a BEiT-style ViT (blocks.i.*)
    or a Swin (layers.s.blocks.j.*), picked from the parameter names.

    One group per (layer id, decay / no decay), named layer_{id}_{decay|no_decay}, in order of first
    appearance; each {'group_name', 'weight_decay', 'lr': base_lr * scale, 'lr_scale': scale,
    'params'} with scale = layer_decay ** (num_layers - 1 - id). Drive the lrs with
    util.lr_sched.SimMIMLRSchedule (single decay), not adjust_learning_rate. Official decays: 0.65
    ViT-B, 0.9 / 0.8 Swin-B, 0.7 Swin-L.
    """
    groups = _finetune_groups(model, base_lr, weight_decay, layer_decay)
    return [{k: v for k, v in g.items() if k != "names"} for g in groups.values()]


def simmim_param_group_names_lrd(model, base_lr, weight_decay=0.05, layer_decay=0.65):
    """The groups of simmim_param_groups_lrd by group name, with parameter names instead of tensors."""
    groups = _finetune_groups(model, base_lr, weight_decay, layer_decay)
    return {name: {**{k: v for k, v in g.items() if k not in ("params", "names")}, "params": g["names"]}
            for name, g in groups.items()}
