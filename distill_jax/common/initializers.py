"""Weight initialisers shared by models, connectors and trainable loss terms.

A leaf module (Flax only), so loss terms can use the framework's initialisation without
importing the model zoo.
"""

import flax.linen as nn

# Kaiming normal, fan-out, gain sqrt(2): PyTorch's `kaiming_normal_(mode='fan_out',
# nonlinearity='relu')`, which the CRD code applies to every convolution.
conv_kernel_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
# PyTorch's default `nn.Linear` weight init: uniform(-1/sqrt(fan_in), 1/sqrt(fan_in)).
dense_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
