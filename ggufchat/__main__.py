from ggufchat.cli.main import run

run()
