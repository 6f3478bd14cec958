"""Classification losses for the RoI box head: the baselines (``baselines``), one module per paper loss
(``concurrent_softmax``, ``acsl``, ``seesaw``, ``eqlv2``, ``federated``), the kernels they share (``kernels``), and
the registry with the typed ``LossSpec`` (``registry``). The public names are re-exported here."""

from lt_models.losses.acsl import ACSL_BACKGROUND_SHARE, FREQUENCY_CODES, ACSLLoss, acsl_ignored, acsl_loss, check_xi
from lt_models.losses.baselines import (
    BCELoss,
    EQLLoss,
    MultiHotSoftmaxLoss,
    SoftmaxCELoss,
    check_eql_lambda,
    check_labels,
    eql_weights,
)
from lt_models.losses.concurrent_softmax import (
    ILL_CONDITIONED,
    ConcurrentSoftmaxLoss,
    concurrent_softmax_loss,
    concurrent_softmax_scores,
    rate_to_csr,
)
from lt_models.losses.eqlv2 import EQLv2Loss, check_eqlv2_alpha, check_eqlv2_gamma, check_eqlv2_mu
from lt_models.losses.federated import FederatedLoss, check_fed_num_classes
from lt_models.losses.registry import (
    LOSS_ARGS,
    LOSS_INPUTS,
    LOSS_PARAMS,
    LOSSES,
    SCORES,
    LossSpec,
    RescoredLoss,
    build_loss,
    check_loss_param,
    check_scores,
    loss_inputs,
)
from lt_models.losses.seesaw import SeesawLoss, check_seesaw_p, check_seesaw_q

__all__ = [
    "LOSSES",
    "LOSS_ARGS",
    "build_loss",
    "LossSpec",
    "LOSS_PARAMS",
    "LOSS_INPUTS",
    "check_loss_param",
    "loss_inputs",
    "SCORES",
    "check_scores",
    "RescoredLoss",
    "check_labels",
    "SoftmaxCELoss",
    "MultiHotSoftmaxLoss",
    "BCELoss",
    "EQLLoss",
    "eql_weights",
    "check_eql_lambda",
    "ConcurrentSoftmaxLoss",
    "concurrent_softmax_loss",
    "concurrent_softmax_scores",
    "rate_to_csr",
    "ILL_CONDITIONED",
    "ACSLLoss",
    "acsl_ignored",
    "acsl_loss",
    "check_xi",
    "FREQUENCY_CODES",
    "ACSL_BACKGROUND_SHARE",
    "SeesawLoss",
    "check_seesaw_p",
    "check_seesaw_q",
    "EQLv2Loss",
    "check_eqlv2_gamma",
    "check_eqlv2_mu",
    "check_eqlv2_alpha",
    "FederatedLoss",
    "check_fed_num_classes",
]
