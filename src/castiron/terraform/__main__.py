"""``python -m castiron.terraform``: serve the provider, as ``castiron terraform-provider``
does, without the CLI's start-up (Terraform starts the provider several times per command)."""

from castiron.terraform.provider import serve

if __name__ == "__main__":
    serve()
