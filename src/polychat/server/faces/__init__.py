"""The wire formats the server speaks to its clients, one module each: ``openai`` (the OpenAI API at ``/v1``, and
the Gravityengine route at ``/api/openai/v1``), ``h2o`` (the 2023 H2O chat protocol), ``freegpt`` (freegpt-webui's
route), ``web`` (the web chat's page and JSON API; ``vendor`` holds its browser libraries) and ``sessions`` and
``answers`` (the browser sessions, and the answers stored as they are written, the H2O face and the web chat
share). A face builds on :mod:`polychat.server.gateway` and
:mod:`polychat.server.store`, never on another face.
"""
