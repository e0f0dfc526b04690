"""Continual updates: a new version of a registered model from new rows and server feedback,
trained from the production version's weights with a replay of earlier rows, and promoted only
if it keeps what production knew (see ``updater``).

    from domaintune.update.updater import update
    result = update("support-intents", ["new_tickets.csv"], feedback=True)
"""
