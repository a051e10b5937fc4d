"""Everything that turns pixels into a place descriptor.

`model` imports no other package of this project: index, train and server all
build on it (see docs/ARCHITECTURE.md).
"""
