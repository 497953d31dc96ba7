"""chatlib: the base-service library every chat service is built on.

One place for configuration, errors, logging, event and frame schemas,
Kafka and MongoDB access, the HTTP app factory and the service lifecycle.
"""
