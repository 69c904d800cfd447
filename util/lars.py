"""LARS optimizer (You et al., 2017, "Large Batch Training of Convolutional Networks"), as used
by MAE for linear probing (MAE paper, Appendix A.3).

For a matrix / conv weight p (ndim > 1), with g its gradient:

    dp  = g + weight_decay * p
    q   = trust_coefficient * ||p|| / ||dp||     (1 when ||p|| == 0 or ||dp|| == 0)
    mu  = momentum * mu + q * dp                 (mu starts at zero)
    p  -= lr * mu

1-D params (biases, norm weights) get neither weight decay nor trust scaling: dp = g.
Param groups may carry extra keys such as 'lr_scale'; `util.lr_sched` sets each group's 'lr'.
"""
import torch


class LARS(torch.optim.Optimizer):
    """SGD with momentum and a layer-wise trust ratio; momentum buffer kept in state['mu']."""

    def __init__(self, params, lr: float = 0, weight_decay: float = 0, momentum: float = 0.9,
                 trust_coefficient: float = 0.001):
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum,
                        trust_coefficient=trust_coefficient)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                dp = p.grad
                if p.ndim > 1:  # not a bias or a norm weight
                    dp = dp.add(p, alpha=group["weight_decay"])
                    dp = dp.mul(self._trust_ratio(p, dp, group["trust_coefficient"]))

                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p)
                mu = state["mu"]
                mu.mul_(group["momentum"]).add_(dp)
                p.add_(mu, alpha=-group["lr"])
        return loss

    @staticmethod
    def _trust_ratio(p: torch.Tensor, dp: torch.Tensor, trust_coefficient: float) -> torch.Tensor:
        """0-dim tensor trust_coefficient * ||p|| / ||dp||, or 1 if either norm is 0 (no host sync)."""
        param_norm = torch.linalg.vector_norm(p)
        update_norm = torch.linalg.vector_norm(dp)
        one = torch.ones_like(param_norm)
        both_positive = (param_norm > 0) & (update_norm > 0)
        return torch.where(both_positive, trust_coefficient * param_norm / update_norm, one)
