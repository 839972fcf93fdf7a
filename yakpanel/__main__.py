from yakpanel.cli import app

app(prog_name="yakpanel")
