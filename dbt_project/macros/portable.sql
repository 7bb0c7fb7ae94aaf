{#- SQL that differs between warehouses, dispatched by adapter: the models build on DuckDB and PostgreSQL. -#}

{% macro split_bucket(column) %}
    {{- return(adapter.dispatch('split_bucket', 'flywheel')(column)) -}}
{% endmacro %}

{#- The md5 of the value as a little-endian 128-bit number, mod 100 (0-99): an image's split forever. -#}
{% macro duckdb__split_bucket(column) -%}
    cast(md5_number({{ column }}) % 100 as integer)
{%- endmacro %}

{#- The same number as DuckDB's md5_number(...) % 100, from the digest's 16 bytes: byte i weighs 256^i mod 100. -#}
{% macro postgres__split_bucket(column) -%}
    (({% for i in range(16) %}get_byte(decode(md5({{ column }}), 'hex'), {{ i }}) * {{ (256 ** i) % 100 }}{% if not loop.last %} + {% endif %}{% endfor %}) % 100)
{%- endmacro %}

{#- The relation's columns but `excluded`, each as prefix.column (what DuckDB writes `prefix.* exclude (...)`). -#}
{% macro columns_except(relation, excluded, prefix) -%}
    {%- if execute -%}
        {%- set kept = [] -%}
        {%- for column in adapter.get_columns_in_relation(relation) if column.name | lower not in excluded -%}
            {%- do kept.append(prefix ~ '.' ~ adapter.quote(column.name)) -%}
        {%- endfor -%}
        {{ kept | join(', ') }}
    {%- else -%}
        {{ prefix }}.*
    {%- endif -%}
{%- endmacro %}

{#- Before any row: what an incremental model compares against when it is still empty. -#}
{% macro earliest_timestamp() -%}
    cast('1900-01-01 00:00:00' as {{ dbt.type_timestamp() }})
{%- endmacro %}
