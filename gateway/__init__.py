"""The maas gateway: the one public endpoint, routing, caching and protecting calls to the model services."""
