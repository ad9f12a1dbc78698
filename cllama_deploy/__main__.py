from cllama_deploy.cli import run

run()
