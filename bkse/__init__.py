"""bkse's KernelWizard (nonlinear blur model) and the `nonlinear_blur` operator.

`bkse.kernel_wizard` holds the network, `bkse.loader` builds it from an options YAML with its
checkpoint, and `bkse.operator` registers `nonlinear_blur` (imported by guided_diffusion.measurements).
"""
