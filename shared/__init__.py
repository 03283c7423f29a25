"""The common library of the maas cluster: errors, settings, tensors, the model store and gRPC server plumbing."""
