"""What people look at after a run: the HTML report and the web demo (templates live in
smoltrain/templates, shared with the model card). Imports anything but the CLI.
"""
