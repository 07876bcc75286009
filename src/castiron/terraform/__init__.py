"""The Terraform edge: a provider for castiron (:mod:`castiron.terraform.provider`, the only
module importing ``tf``), what it does in castiron's words (:mod:`.operations`), and writing
the provider's installation for Terraform (:mod:`.setup`)."""
