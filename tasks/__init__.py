"""hubworks: the doit graph that builds the internal channel, the images and the hub.

One module per concern: settings, recipes, channel_index, server, images, engines, hub.
``dodo.py`` imports the task creators from here.
"""
