"""The `ermgap` command line: thin wrappers over the library API.

Command modules import the library inside each command, not at module top: `ermgap --help`,
`ermgap data validate` or `ermgap config show` must not pay for importing torch, Ray,
transformers and DeepSpeed (seconds each) that only training and evaluation need.
"""
