// placeholder, replaced by the stage's golden tests
